"""Model architectures, one file each (`falcon.py`: Falcon 1 and Falcon2; `llama.py`:
Falcon3), each with a frozen config dataclass that uses Hugging Face's key names.
The package's folder also holds the embedded default model's files (`falconet-tiny/`)."""
