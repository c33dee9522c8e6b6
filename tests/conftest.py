import os
import sys
import tempfile
from pathlib import Path

# Offline always: a hub lookup would retry for ~47 s before failing. HF_HOME goes to a temp dir
# so tests never read or write the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="gill-hf-test-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # tests import their tiny builders by module name
