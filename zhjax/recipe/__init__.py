"""`zhjax recipe`: the whole Chinese-LLaMA method on one config (`run`), with the learning curves of the
comparison runs (`curves`) and the cloze-accuracy row (`cloze`)."""

from zhjax.recipe.run import EvalConfig, RecipeConfig, format_results, load_recipe_config, run_recipe

__all__ = ["EvalConfig", "RecipeConfig", "format_results", "load_recipe_config", "run_recipe"]
