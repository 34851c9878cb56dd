// LoRA Workshop: a tooltip on the family badge of Lora cards (the badge itself is CSS).
(function() {
    function label(card) {
        var family = card.dataset.sortLwfamily;
        if (!family || card.title) return;
        card.title = card.dataset.sortLwcompat === "no" ?
            family + " LoRA: made for another model family than the loaded checkpoint" :
            family + " LoRA";
    }
    function update() {
        document.querySelectorAll(".extra-network-pane .card[data-sort-lwfamily]").forEach(label);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(update);
    }
})();
