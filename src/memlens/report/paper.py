"""The numbers Savine et al. report (LLaMA-2-7B on PHEE), shown beside the ones measured."""

# Table 3.1: ROC AUC of the reference attack, +-95% Hanley-McNeil interval, 3 epochs, alpha 16.
TABLE_3_1 = {
    ("Q", 1): 0.68, ("K", 1): 0.68, ("V", 1): 0.80, ("O", 1): 0.77, ("Q+K", 1): 0.76,
    ("Q", 2): 0.70, ("K", 2): 0.71, ("V", 2): 0.82, ("O", 2): 0.79, ("Q+K", 2): 0.77,
    ("Q", 4): 0.72, ("K", 4): 0.71, ("V", 4): 0.83, ("O", 4): 0.80, ("Q+K", 4): 0.79,
}
TABLE_3_1_HALF_WIDTH = {0.68: 0.02, 0.70: 0.02, 0.71: 0.02, 0.72: 0.02, 0.76: 0.02, 0.77: 0.02, 0.79: 0.01,
                        0.80: 0.01, 0.82: 0.01, 0.83: 0.01}

# Fig. 3.6: AUC against rank, Q, K, V and O adapted (values read off the plot, about +-0.0005).
FIG_3_6 = {1: 0.909, 2: 0.924, 4: 0.931, 8: 0.939, 16: 0.942, 32: 0.944, 64: 0.945, 128: 0.9456, 256: 0.945,
           512: 0.944}

# Fig. 3.4 / 3.5: R^2 of the linear fit of the share of n-gram against fine-tuned / base perplexity.
FIG_3_4_R2 = 0.135
FIG_3_5_R2 = 0.004

SOURCE = ("Savine et al., \"Memorization in Fine-Tuned Large Language Models\", arXiv 2507.21009: LLaMA-2-7B, "
          "LoRA, PHEE (2898 train members vs 968 test non-members)")
