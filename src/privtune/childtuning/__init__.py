"""Child-Tuning (Xu et al. 2021): ``mask`` (CT_F's Bernoulli mask, CT_D's fixed mask) and ``fisher``
(the Fisher information and the exact top-p_D mask; its DP release is :mod:`privtune.dp.fisher_release`)."""
