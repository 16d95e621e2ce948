"""Where a delta leaves deltapack and comes back: llama.cpp GGUF files (a merged model, a LoRA adapter) and PEFT
LoRA adapters, both read through one view of a fine-tune (finetune.FineTune), and PEFT adapters imported as
deltas."""
