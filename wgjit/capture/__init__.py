"""The capture room: where handshake initiations come from (AF_PACKET + classic BPF)."""
