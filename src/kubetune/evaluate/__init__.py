"""Evaluation like a user judges a chatbot: generated replies vs references, base vs fine-tuned."""
