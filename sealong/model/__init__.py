"""The lean Llama-3.x / Qwen-2.5 decoder, loaded from Hugging Face checkpoint folders."""
