"""Deployment: the exported formats, the runtimes that answer with a finished model, the HTTP server.
"""
