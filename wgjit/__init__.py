"""wgjit: just-in-time WireGuard peers.

A gateway keeps peers in a store and installs one on the WireGuard device only when its
handshake initiation arrives and authenticates.
"""

__version__ = "0.1.0"
