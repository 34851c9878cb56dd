"""Test stand-in for the AUTOMATIC1111 stable-diffusion-webui ``modules`` package.

Mirrors the API of stable-diffusion-webui **v1.10.1 (commit 82a973c0)**: module paths,
function/class names and parameters are the real ones for everything LoRA Workshop's glue
touches; behaviour is reduced to what the tests need.  Written from the public API
(signatures and documented behaviour) — no WebUI code is copied (the WebUI is AGPL).

Deliberately faithful details (the glue depends on them):
- ``extra_networks``: the registry is a plain dict keyed by name (last registration wins);
  aliases are only consulted when the name itself is not registered; ``activate`` calls every
  registered network not mentioned in the prompt with an empty list.
- ``script_callbacks``: callbacks run in registration order, except ``before_ui`` and
  ``script_unloaded`` which run in *reverse* order.
- ``ui_extra_networks.extra_pages`` is a list that ``create_ui`` copies once per tab.
- ``api.api.Api.auth`` is HTTP Basic against ``--api-auth`` "user:pass,user2:pass2".
- preload scripts of user extensions run *before* those of built-in extensions.
"""
