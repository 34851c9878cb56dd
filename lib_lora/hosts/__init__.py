"""Hosts: the programs LoRA Workshop runs inside, the AUTOMATIC1111 WebUI (``webui*.py``) and the
command line (``cli/``).

What a host fills (each declared once, in the file named):

- the runtime: a ``ModelMap`` of the host's model given to ``Runtime.set_model``, then
  ``Runtime.activate``/``restore`` (runtime.py) merge and put back; the WebUI's map comes from
  ``webui_host.WebUIHost.model_map``, the CLI's from ``ModelMap.build`` over its ``Checkpoint``;
- training: a ``training.model.TrainableModel``, which the WebUI builds as a
  ``training.host.TrainingHost`` (lock, progress, folders, ``build_model``) for ``JobRunner``,
  and the CLI from its ``Checkpoint`` (``cli/checkpoint.py``);
- tools: ``tools.jobs.ToolHost`` (names, folders, lock, progress).
"""
