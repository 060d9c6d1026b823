from model_rollouts.cli.app import main

main()
