"""Ray Job entrypoint for the index stage: python -m jobs.index PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("index")
