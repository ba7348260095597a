"""What continuous validation compares with: drift statistics, the autoencoder and the reference
profile export writes. Imports core, data, training and scoring."""
