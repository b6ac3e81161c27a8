# %% [markdown]
# ## 4 · How many hops? BigBird's graph argument
#
# Read a pattern as a directed graph: an edge $i \to j$ when query $i$ attends to key $j$. After $L$ layers the output
# at $i$ can depend on the input at $j$ exactly when there is a path of at most $L$ edges from $i$ to $j$ (every
# pattern here contains the diagonal, so shorter paths can be padded). The number of layers a token needs to hear
# from *every* other token is the graph's **diameter**; the average distance says how far a typical pair is apart.
#
# * window only: a path graph of blocks — the diameter grows like $N / b$;
# * window + random blocks: random edges make a *small world* (Watts–Strogatz, Erdős–Rényi) — the diameter
#   grows like $\log N$;
# * window + global: every token reaches a global token in one hop and the global token reaches everything —
#   **two hops**, whatever $N$ (the star graph in BigBird's universality proof).
#
# BigBird's patterns are made of whole blocks, so the hop counts between tokens equal those between blocks: the
# breadth-first search below runs on the $n_b \times n_b$ block graph (`scipy.sparse.csgraph.shortest_path`, one BFS
# per source).

# %%
from scipy.sparse.csgraph import shortest_path


def hops(pattern):
    """All-pairs hop counts of the directed graph i -> j (i attends to j); inf = unreachable."""
    return shortest_path(np.asarray(pattern, dtype=np.int8), method="D", directed=True, unweighted=True)


def block_graph(nb, g, r, seed=0):
    layout = bb_mod.draw_random_blocks(np.random.default_rng(seed), nb, r, g)
    return bb_mod.build_pattern(nb, block=1, random_blocks=layout, global_blocks=g)   # block size 1: the block-level graph


nbs = [16, 32, 64, 128, 256]
kinds = {"window": (0, 0), "window + random (r=3)": (0, 3), "window + global (g=1)": (1, 0),
         "window + global + random": (1, 3)}
diam = {kind: [int(hops(block_graph(nb, g, r)).max()) for nb in nbs] for kind, (g, r) in kinds.items()}
mean = {kind: [float(hops(block_graph(nb, g, r)).mean()) for nb in nbs] for kind, (g, r) in kinds.items()}
for kind in kinds:
    print(f"{kind:26s} diameter {[int(x) for x in diam[kind]]}   mean {[round(x, 2) for x in mean[kind]]}")
assert all(x == 2 for x in diam["window + global (g=1)"])
assert diam["window"] == [nb - 1 for nb in nbs]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for kind in kinds:
    axes[0].plot(nbs, diam[kind], "o-", label=kind)
    axes[1].plot(nbs, mean[kind], "o-", label=kind)
axes[0].set_title("diameter (layers to hear from everyone)"); axes[1].set_title("mean hops between two blocks")
for ax in axes:
    ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("number of blocks $n_b$"); ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# The same search on *token*-level patterns: hops from every token to every other for Longformer's band (with and
# without the global token) and a dilated band, at $N = 96$. Each picture is the matrix of hop counts, row $i$ =
# how many layers token $i$ needs to hear from token $j$.

# %%
n_ = 96
pats = {"band w=4": lf_mod.build_pattern(n_, w=4),
        "dilated band w=4, delta=3": lf_mod.build_pattern(n_, w=4, dilation=3),
        "band w=4 + global {0}": lf_mod.build_pattern(n_, w=4, global_positions=(0,))}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, (title, p) in zip(axes, pats.items()):
    h = hops(p)
    finite = np.isfinite(h)
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("#9e9e9e")                                   # unreachable pairs in grey
    im = ax.imshow(np.ma.masked_invalid(h), cmap=cmap, interpolation="nearest")
    ax.set_title(f"{title}\ndiameter {h[finite].max():.0f}" + ("" if finite.all() else " (some pairs unreachable)"),
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
plt.tight_layout(); plt.show()

# %% [markdown]
# The dilated band alone never connects different residues modulo $\delta$ (unreachable pairs, in grey):
# that is why the paper mixes dilated heads with undilated ones — across heads the union of patterns is connected,
# with a longer reach per layer.
