"""Looking at results: representation similarity (CKA, SVCCA), the comparison report and the plots."""
