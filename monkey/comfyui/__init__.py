"""MONKEY in ComfyUI: nodes over ComfyUI_IPAdapter_plus patches (imported only inside ComfyUI)."""
