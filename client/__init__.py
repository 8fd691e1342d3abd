"""The merchant side: local DP-SGD training, the privacy ledger writer and the Flower ClientApp."""
