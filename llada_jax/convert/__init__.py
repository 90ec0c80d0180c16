"""Hugging Face interop: LLaDA (LLaDAModelLM), Llama, Qwen2 and Qwen3 checkpoints <-> workdirs.

- `hf.import_hf(hf_dir, workdir)`, `hf.export_hf(workdir, hf_dir)`: whole directories, one tensor
  in memory at a time (the CLI is tools/convert_hf.py).
- `layouts`: the tensor-by-tensor mapping between HF keys/shapes and our parameter tree.
- `hf_llada`, `hf_llama`: their config.json <-> ModelConfig; in-memory `params_from_hf` /
  `params_from_llama` for small models and tests (Llama, Qwen2 and Qwen3).
- `safetensors_io`: sharded safetensors reading and streaming writing (float32, bfloat16).
- `hf_tokenizer`: our tokenizers as Hugging Face tokenizer files (sentencepiece converted).
"""
