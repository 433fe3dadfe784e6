"""Command line: the BIDS-App (``BIDS_DIR OUTPUT_DIR participant|group``), its tools and descriptors."""
