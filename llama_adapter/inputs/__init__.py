"""What goes into the model: text (tokenizer, prompt templates) and images."""
