"""The pack's AR stage as a shared, batched service (Ray Serve), speaking SGLang's ``/generate`` contract.

Top floor beside ``nodes`` and ``headless``: it imports ``core``; nothing in the pack imports it.
"""
