"""Proof with packets: the ruleset the kernel holds, loaded into a throw-away replica
namespace and probed with real packets from addresses the policy admits and denies.

probes (pure) plans the probe addresses and the policy's answer for each, over the
kernel's elements as the kernel adapter reads them; packets (pure) builds the frames;
replica (adapter, with fake as its stand-in) owns the namespaces, the copy of the
ruleset and the observation; report (pure) compares; run ties them together with the
prober injected.
"""
