from e8vllm.cli import main

main()
