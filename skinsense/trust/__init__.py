"""The rules the app applies to each image, fitted by evaluation: quality checks before the model,
the out-of-domain gate on its features, calibrated probabilities and the referral rule after."""
