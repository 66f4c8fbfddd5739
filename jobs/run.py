"""Ray Job entrypoint for the whole run (index → retrieve → transform → distill → evaluate),
resumable: python -m jobs.run PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main(None)
