from typing import List  # noqa: UP035 - KFP resolves typing.List annotations

from kfp import dsl

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def settings(preset: str, overrides: list, train_steps: int, learning_rate: float,
             batch_pairs: int, model_variant: str, llm: str, vision: str) -> List[str]:  # noqa: UP006
    """The overrides every later task resolves its config from: ``overrides`` plus one
    ``key=value`` per typed parameter that is set (0 or empty: the preset's value). Fails on an
    unknown key, a bad value, or a key set two different ways."""
    from components.common.config import merge_overrides

    return merge_overrides(preset, overrides, train_steps=train_steps,
                           learning_rate=learning_rate, batch_pairs=batch_pairs,
                           model_variant=model_variant, llm=llm, vision=vision)
