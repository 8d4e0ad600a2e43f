"""Client-side tools that talk to a running regproxy over HTTP: ``warm``, ``export``, ``import``.

They never touch the store directly: everything goes through the V2 API, so warming
shares the server's single-flight fills and imports go through the hosted-upload checks.
"""
