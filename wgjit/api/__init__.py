"""`wgjit serve`: the admin HTTP API (wgjit.api.app) and its server (wgjit.api.serve)."""
