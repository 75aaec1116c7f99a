"""The sidecar runtime: the publisher's slow work, in processes beside vLLM's, off its GIL.

- ``process``: the launcher (``Sidecar``) and the sidecar's main loops;
- ``messages``: the typed messages between an engine process and its sidecar;
- ``ring``: the shared memory ring that carries captured tensors to the worker sidecar;
- ``encode`` and ``uploader``: tensors -> objects -> the store (worker sidecar);
- ``events`` and ``dispatcher``: finished requests -> events -> the sink (scheduler sidecar).
"""
