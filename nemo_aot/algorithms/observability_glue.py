"""Placeholder observer until observability lands (replaced in the same session)."""
import json, os


class RunObserver:
    def __init__(self, cfg, model_arch, enabled=True):
        self.enabled = enabled
        self.metrics_path = os.path.join(cfg.logging.output_dir, "metrics.jsonl")
        self.plots = []
        if enabled:
            os.makedirs(cfg.logging.output_dir, exist_ok=True)

    def log(self, split, step, metrics):
        if self.enabled and metrics:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
            print(split, step, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})

    def on_validation(self, step, metrics, rewards):
        pass

    def resumed(self, path, step):
        print("resumed", path, step)

    def close(self):
        pass
