"""The Gradio app's parts (app.py wires them): model loading, the chat handler, the latency tab."""
