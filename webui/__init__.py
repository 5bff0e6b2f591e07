"""The Gradio app (the subpackage tnllm.webui): `launch.py` wires the parts (model loading, the chat handler, the
tabs) and serves them; `python app.py` and `tnllm-chat` run it."""
