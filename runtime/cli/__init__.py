"""The command line (``launch.py``): the parser (runtime/cli/parser.py), the commands' own configs
(runtime/cli/configs.py), prompt inputs (runtime/cli/prompts.py) and the commands (runtime/cli/commands.py).
The top layer: it reads argparse namespaces, builds typed configs from them once, and hands those down."""

USAGE = """examples:
  python launch.py run                                   # embedded SmolLM2-135M-Instruct, default chat prompt
  python launch.py pack --checkpoint DIR_OR_GGUF --out model.img [--dtype bf16]
  python launch.py pack --synthetic llama3.1-8b --layers 4 --out synth.img
  python launch.py run --image model.img --prompt "Hello" --chat --max-new-tokens 64
  python launch.py perplexity --image model.img --text-file wiki.txt --context 512
  python launch.py verify --image model.img
  python launch.py bench --image model.img --prompts prompts.txt --max-new-tokens 32 --out-json bench.json
  python launch.py probe --image model.img --gpu-mem-gb 24 --dram-gb 64 --out-json probe.json
  python launch.py run --image model.img --prompt "Hello" --trace run.trace.json   # then ui.perfetto.dev
  python launch.py pool start --image model.img --name m; python launch.py run --attach m; pool stop m
  python launch.py pool serve m --device cuda --gpu-mem-gb 20   # runs --attach m then go through its server

Every user error (bad file, bad flag value) prints one line to stderr and exits with code 2; --help on any
command explains its flags."""
