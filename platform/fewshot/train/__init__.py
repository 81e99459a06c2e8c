"""Training: one worker's loop (`loop`), a local run (`runner`), Ray Train (`distributed`)."""
