from model_rollouts.cli import main

main()
