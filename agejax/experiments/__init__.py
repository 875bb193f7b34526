"""The studies: the few-shot learning curve, imposed label distributions, frozen-vs-full transfer."""
