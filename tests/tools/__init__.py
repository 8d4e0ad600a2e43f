"""The command-line tools: warm, export, import, cache commands, client-config."""
