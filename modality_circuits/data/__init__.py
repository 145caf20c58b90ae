"""Model-free task prompts and their renderings, and aligned (prompt, counterfactual) pairs with D/Q/G spans."""
