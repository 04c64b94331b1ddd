"""The byte mover: one request to the upstream and its bytes back, unchanged; header and path checks, content decoding of a copy, stream edits, the body guard."""
