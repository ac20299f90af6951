"""Getting bundles onto devices: signing them, flashing one device, serving them, rolling them out.

``signing``  Ed25519 keys and ``manifest.sig`` (``edgefleet keys``, ``build --sign-key``)
``flash``    one device: a local or ssh:// drop, or a deploy command over MQTT (``edgefleet flash``)
``serve``    an HTTP server with Range support that devices download bundles from (``edgefleet serve``)
``deploy``   a fleet: canary waves over MQTT (``edgefleet fleet deploy``)
"""
