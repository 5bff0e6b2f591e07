"""Launcher of the chat app from a checkout: `python app.py [flags]`, how a Hugging Face Space runs it (the Space
installs requirements.txt, not this package; `tnllm` is then found next to this file). The app itself, its
flags and launch settings are in tnllm/webui/launch.py; an installed package runs it as `tnllm-chat`."""

from tnllm.webui.launch import main

if __name__ == "__main__":
    main()
