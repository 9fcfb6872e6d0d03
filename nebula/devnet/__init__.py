"""Local development networks: pinned CometBFT chains signed by local Nebula nodes.

``nebula demo`` and the end-to-end tests share this code:

* :mod:`nebula.devnet.cometbft` builds pinned CometBFT releases with Go (cached), runs
  single-validator local chains and checks their commits' signatures independently;
* :mod:`nebula.devnet.network` runs multi-validator networks of such nodes (one genesis,
  full mesh), including one validator key on two nodes;
* :mod:`nebula.devnet.cluster` writes Nebula node directories (one local node or a Raft
  cluster on 127.0.0.1) and runs ``nebula start`` processes;
* :mod:`nebula.devnet.ports` hands out free loopback ports;
* :mod:`nebula.devnet.softhsm` makes private SoftHSM2 installations (PKCS#11 tokens).

Nothing here is needed to run a signer in production.
"""
