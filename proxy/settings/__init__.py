"""Settings: the tables of ``config.toml`` parsed into typed, validated dataclasses.

Pure parsing, at the bottom of the layers: :mod:`.fields` holds :class:`~.fields.ConfigError`
and the field parsers every section shares, each other module parses one section and
imports only those; :mod:`proxy.config` composes them. Nothing here builds runtime objects
(TLS contexts, password checkers); the modules that do import their settings from here.
"""
