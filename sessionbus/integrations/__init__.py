"""Plug the bus into other frameworks, each behind its own optional extra.

* :mod:`sessionbus.integrations.vision_agents` (``pip install
  'sessionbus[vision-agents]'``): :class:`NatsSessionKVStore`, a Vision
  Agents ``SessionKVStore`` on the bus's JetStream KV, for Vision Agents' own
  ``SessionRegistry(store=...)``.
* :mod:`sessionbus.integrations.ag2` (``pip install 'sessionbus[ag2]'``):
  ``NatsStorage``, AG2's history ``Storage`` on JetStream, and
  ``SessionStore``, AG2's MCP session store made multi-node.
* :mod:`sessionbus.integrations.autogen_beta` (``pip install
  'sessionbus[autogen-beta]'``): the same ``NatsStorage`` for autogen 0.14's
  ``autogen.beta``.

Nothing here is imported by the core packages, and importing this package
imports no framework: each module imports its own when it is imported.
"""
