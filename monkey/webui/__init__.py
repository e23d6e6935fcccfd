"""MONKEY in the AUTOMATIC1111 WebUI and in Forge/reForge, which run its processing.

``run`` holds the two passes over ``p.sample``; ``backend`` the interface to where the
IP-Adapter lives: sd-webui-controlnet (``controlnet``) or Forge's integrated ControlNet
(``forge``, ``forge_attn``). ``ui`` builds the accordion, Settings, XYZ axes and API route from
the settings model. Only ``scripts/sd_webui_monkey.py`` imports this package.
"""
