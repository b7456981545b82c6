"""What the two training loops share: the classifier's (`seqtrain.train`) and the language model's
(`seqtrain.pretrain`). Each recipe reads setup -> loop -> evaluate/save -> finish, and takes from here:

    init_from   model.init_from: a pretrain run's tokenizer and weights, checked against the config
    run_dir     processes and threads, the run directory's lock, fresh or resumed, DDP, finish
    loop        the epoch/batch skeleton: signals, max_steps, the log and evaluation cadence

Nothing here knows a model's loss or metric: the recipes pass their step and evaluation as functions.
"""
