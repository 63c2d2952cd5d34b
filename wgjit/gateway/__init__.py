"""The gateway room: admission policy (core), its building blocks (limits), its loop (run)."""
