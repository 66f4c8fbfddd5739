"""Ray Job entrypoint for the distill stage: python -m jobs.distill PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("distill")
