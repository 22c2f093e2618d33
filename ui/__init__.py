"""The web app's pages, one module per tab of QA-LoRA Studio: ``new_job`` (the fine-tune form),
``jobs`` (the queue, a job's progress, downloads and benchmarks), ``compare`` (runs side by side),
``chat`` and ``publish``; ``common`` holds what several tabs share and ``auth`` who may use the app.
Each module only lays out widgets and wires them to handlers that call the jobs tier (``jobs.service``
and the form, chat and publish helpers it stands beside; the library only for its config and errors);
``app.py`` puts the tabs in one page.
"""
