"""Architectures for compose-time tests: a model group's architecture, and an extracted-.nemo
folder holding only its model_config.yaml (what compose-time checks read from ``init_from``),
so recipes for 8B/70B models compose and validate without weights."""

import os

# The embedded demo without its checkpoint: the model section then defines the architecture.
DEMO_WITHOUT_CHECKPOINT = ["recipe=demo", "init_from=null", "data.tokenizer_path=bundled:tokenizer"]


def model_group(name: str):
    """GPTModelConfig of conf/model/<name>.yaml."""
    from omegaconf import OmegaConf

    from nemo_aot.algorithms.config import compose_raw
    from nemo_aot.models.config import GPTModelConfig

    raw = compose_raw("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, f"model={name}"])
    return GPTModelConfig.from_dict(OmegaConf.to_container(raw.model, resolve=True))


def config_only_nemo(model, root) -> str:
    """An extracted .nemo folder under ``root`` with only ``model``'s model_config.yaml."""
    import yaml

    from nemo_aot.models.nemo_format import CONFIG_NAME, nemo_config_dict

    folder = os.path.join(str(root), f"arch_{model.num_layers}x{model.hidden_size}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        yaml.safe_dump(nemo_config_dict(model), f)
    return folder
