"""The console's screens, one per file: each renders the documents the app hands it and asks for actions
with ``ActionRequested``; none does I/O."""
